"""Not torchvision: PIL stand-ins for the transforms diffusers' train_text_to_image.py imports.

torchvision has no CPU build here, so `benchmarks/run_with_torchvision_stub.py` registers this package as `torchvision` for
diffusers' script only. Each class does what its torchvision namesake does for an RGB PIL image; nothing else is provided.
"""
