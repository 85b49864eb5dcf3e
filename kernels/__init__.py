"""Triton kernels of kalm_fast, installed as ``kalm_fast.kernels`` (one op a file).

Nothing is imported here: this folder must stay harmless if it is ever found as a top-level ``kernels`` package
(transformers probes for the Hugging Face kernel hub under that name).
"""
