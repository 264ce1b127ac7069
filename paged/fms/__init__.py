"""IBM Foundation Model Stack (ibm-fms) integration.

    paged.fms.op          the "pagetable_flex" attention op: plan_step(), bind(model)
    paged.fms.generate    PagedGenerator (batched, continuous batching), forward_logits, fms_generate
    paged.fms.tokenizer   Tokenizer: sentencepiece trained from the shipped corpus, or your tokenizer.model
    paged.fms.checkpoint  tiny HF-format Llama checkpoints for tests; load_fms_llama
    paged.fms.distributed tensor parallel (torchrun): per-rank pools, identical decisions, voted failures
    python -m paged.fms generate --prompt "..."   text in, text out

Import the submodules you need: this package itself imports nothing heavy (FMS and transformers load only
when a submodule that needs them is imported).
"""
