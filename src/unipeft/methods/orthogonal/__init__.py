"""Orthogonal fine-tuning: the frozen weight is multiplied by a learned orthogonal matrix.

    OFT   block-diagonal rotation from skew-symmetric blocks through the Cayley map (oft.py)
    BOFT  product of butterfly-permuted block-diagonal rotations, plus an output scale (boft.py)
    HRA   product of Householder reflections (hra.py)

All three are weight-side deltas (`kind = "weight"`): the base runs with W' = W R (or R W), and
merging writes W' - W, which reads the base weight, so core caches it for an exact unmerge.
The on-disk layout is PEFT's (oft_R.weight, boft_R / boft_s, hra_u).
"""
