"""The steps after the chapter: LoRA (lora.py), preference tuning with DPO (dpo.py), taking a model
elsewhere (export.py, book_format.py) and training on several GPUs (distributed.py)."""
