"""DAN / sparse distillation: hashed n-gram bag students (fastText-style input layer).

benchmark.py: the ``ngram_bag`` op against the torch compositions a user would otherwise run.
"""
