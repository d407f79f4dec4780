"""Hugging Face in and out: ``export_hf`` (a run -> a ``LlamaForCausalLM`` folder) and the
continued-pretraining import behind ``train.init_from``.

    mapping          the one table: config fields, tensor names, the RoPE row permutation (both directions)
    weights          tensor transforms (permutation, tied head) one tensor at a time
    files            config.json / safetensors (sharded) / index reading and writing; no pickle
    tokenizer_files  tokenizer.json + tokenizer_config.json for AutoTokenizer (ids checked)
    export           ``export_hf`` and its validation
    init             ``train.init_from``: model keys from a folder, weights into a fresh model
"""

from leanlm.engine.hf.export import ExportReport, export_hf

__all__ = ["ExportReport", "export_hf"]
