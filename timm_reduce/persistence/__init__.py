"""How a model leaves and re-enters the process: the compact tensor encoding, save/load (`serialization`), the timm
`timm_reduce` entrypoint, the model card, the Hugging Face Hub (the only network code) and ONNX/TorchScript export."""
