"""Help texts and choices of the file and format settings (issue #13), kept here so the settings table stays
one screen per group; ``settings.TrainConfig`` holds the fields."""

LORA_FORMATS = ("diffusers", "kohya", "comfyui")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
GENERATION_PRECISIONS = ("no", "fp32", "fp16", "bf16")
SINGLE_FILE_FLAGS = ("clip_l", "clip_g", "t5xxl", "single_file_config")

HELP = {
    "clip_l": "CLIP-L encoder file (e.g. ComfyUI's clip_l.safetensors) for a single-file model that lacks it.",
    "clip_g": "CLIP-G encoder file (clip_g.safetensors) for a single-file model that lacks it.",
    "t5xxl": "T5-XXL encoder file (t5xxl_fp16.safetensors, or fp8 e4m3 such as t5xxl_fp8_e4m3fn.safetensors, "
    "widened to bf16) for a single-file model that lacks it.",
    "single_file_config": "For a single-file model: the diffusers SD3 folder or hub id whose configs and tokenizers "
    "it uses (weights not needed; default: Stability's repo of the detected model, from the HF cache or the hub).",
    "init_lora": "Start from this LoRA (diffusers, kohya or ComfyUI layout, detected) and train on; its layers are "
    "the targets unless --lora_layers is given, and it is fitted to --rank (SVD when smaller).",
    "lora_format": "Layout of an extra LoRA file beside pytorch_lora_weights.safetensors (diffusers layout, always "
    "written; diffusers and ComfyUI read it): kohya (sd-scripts networks/lora_sd3.py, lora_kohya.safetensors) or "
    "comfyui (ComfyUI's own names, lora_comfyui.safetensors).",
    "save_precision": "Tensor type of the saved adapter files (checkpoints keep fp32 for exact resume).",
    "push_to_hub": "Upload the output folder (LoRA, model card, validation images) to the Hugging Face hub.",
    "hub_model_id": "Hub repository for --push_to_hub (default: the output folder's name under your account).",
    "hub_token": "Hub token for --push_to_hub (default: the stored login); never written to settings.json.",
    "dataset_config_name": "Config of the --dataset_name hub dataset, if it has several.",
    "upcast_before_saving": "Save the adapter in fp32 (the same as --save_precision fp32).",
    "cache_latents": "Accepted for the diffusers script; latents are always cached.",
    "dataloader_num_workers": "Accepted for the diffusers script; batches come from in-memory caches.",
    "local_rank": "Accepted for the diffusers script; accelerate launch sets each process's rank.",
    "prior_generation_precision": "Accepted for the diffusers script; class images use the run's precision.",
    "adam_weight_decay_text_encoder": "Accepted for the diffusers script; the text-encoder LoRA uses "
    "--adam_weight_decay.",
}
