"""TCD full-model distillation of a Stable Diffusion XL teacher (thin wrapper over tcdistill).

SDXL defaults: --resolution 1024, --w_min 3, --min_image_size 700, --max_pwatermark 0.5, --vae_encode_batch_size 8 (each can be overridden).
"""

from tcdistill.cli import train_main

if __name__ == "__main__":
    train_main("full", prog="train_tcd_distill_sdxl_wds.py", family="sdxl")
