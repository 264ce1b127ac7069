"""IBM Foundation Model Stack (ibm-fms) integration: tokenizer and tiny Llama models for tests.

Kept import-light: submodules (``paged.fms.tokenizer``, ``paged.fms.checkpoint``) load their
heavy dependencies only when imported or called.
"""
