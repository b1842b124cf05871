"""Meta-learning: task sampling, the loss, and the Reptile inner loop / pseudo-gradient.

Pure torch: no DeepSpeed calls here (they live in ``mlfound.train``).
"""
