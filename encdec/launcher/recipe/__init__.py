"""The recipe: YAML loading with line numbers, ``--set`` overrides, cross-section rules and their errors.

The section types live in ``encdec.config``; ``schema.Recipe`` puts them together.
"""
