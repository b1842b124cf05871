"""Meta-learning: task sampling, the loss, the methods table and the one outer step (inner loop,
pseudo-gradient, surrogate loss).

Pure torch: no DeepSpeed calls here (they live in ``mlfound.train``).
"""
