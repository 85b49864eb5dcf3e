"""Training recipes (YAML), installed as ``kalm_fast.recipes`` so ``kalm-fast demo`` finds them from any folder."""
