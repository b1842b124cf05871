"""The paper's experiment as a library (tools/paper_experiment.py is its command line): config -> plan ->
prepare (shards, split, start models) -> units (fine-tunes, MACE, MD) -> report, driven by grid."""
