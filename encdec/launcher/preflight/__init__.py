"""Preflight: what is checked before anything expensive starts (registry names, meta build, memory model,
``init_from``), and how the plan is shown.
"""
