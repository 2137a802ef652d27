"""Graph passes. Import ``tqc.passes.registry`` to list or look them up by CLI name."""
