"""Training of target, MDLM drafter and AR drafter models (``specdiff-train``)."""
