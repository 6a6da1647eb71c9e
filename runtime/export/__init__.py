"""Export to and start from the Hugging Face `hunyuan_v1_moe` layout.

`hf_layout` (names, shapes, config.json; torch-free), `convert` (the tensor arithmetic both ways),
`source` (whole tensors from a committed checkpoint), `write` (`hyrun export`), `index` (checksums and
the pre-launch check of `model.init_from`; torch-free), `load` (`init_from` on each rank), `cli`.
Import each name from its module: the torch-free ones must stay importable without torch.
"""
