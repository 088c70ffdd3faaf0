"""Training draft heads by self-distillation from the target (EAGLE-1, EAGLE-3, MTP)."""
