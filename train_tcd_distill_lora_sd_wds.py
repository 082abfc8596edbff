"""TCD LoRA distillation of a Stable Diffusion 1.x/2.x teacher (thin wrapper over tcdistill)."""

from tcdistill.cli import train_main

if __name__ == "__main__":
    train_main("lora", prog="train_tcd_distill_lora_sd_wds.py")
