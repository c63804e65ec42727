"""Tiny diffusers pipelines built offline, for tests: Stable Diffusion (latent, CLIP) and DeepFloyd IF (pixel, T5).

Random weights, a few hundred KB on disk; they save with `save_pretrained` and load back with
`DiffusionPipeline.from_pretrained(folder, local_files_only=True)` like a downloaded snapshot.
Tokenizers are built from vocabularies written here, since nothing can be downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ["a", "an", "the", "red", "blue", "green", "cube", "ball", "cone", "chair", "of", "on", "and", "photo",
         "view", "front", "side", "back", "overhead", "small", "big", "wooden", "table"]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode map (transformers 5 no longer exports it).

    Printable latin-1 bytes map to themselves; the other 68 bytes to code points 256.. in order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def write_clip_vocab(folder: str | Path, words: list[str] = WORDS) -> tuple[Path, Path]:
    """A byte-level BPE vocabulary in CLIP's format (vocab.json + merges.txt) that spells `words` as single tokens.

    Every byte is a token, alone and as an end of word ("x</w>"), so any text tokenizes; merges build each
    listed word left to right."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = f"{pieces[0]} {pieces[1]}"
            if pair not in merges:
                merges.append(pair)
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
            if pieces[0] not in tokens:
                tokens.append(pieces[0])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    vocab_path.write_text(json.dumps(vocab, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


def tiny_clip_tokenizer(max_length: int = 16):
    """A CLIPTokenizer read from the vocab.json / merges.txt that `write_clip_vocab` writes (16 tokens per prompt)."""
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab_path, merges_path = write_clip_vocab(tmp)
        return CLIPTokenizer(vocab=str(vocab_path), merges=str(merges_path), model_max_length=max_length)


def build_tiny_sd_pipeline(folder: str | Path, prediction_type: str = "epsilon", seed: int = 0) -> Path:
    """A tiny StableDiffusionPipeline saved to `folder`: UNet at 8x8 latents (4 channels), a 2-level VAE
    (scale factor 2, so 16 px images), a 2-layer CLIP text encoder of width 32, DDIM with SD's scaled_linear betas."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4, sample_size=16)
    tokenizer = tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder


def tiny_t5_tokenizer(words: list[str] = WORDS):
    """A T5 (Unigram, SentencePiece-style "▁word") tokenizer over `words` plus single letters."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in words]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=77)


def build_tiny_if_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """A tiny DeepFloyd IF stage I (IFPipeline) saved to `folder`: pixel-space UNet at 16x16 whose output has
    6 channels (eps and learned variance, as IF's), a 1-layer T5 encoder of width 32, IF's DDPM scheduler config."""
    from diffusers import DDPMScheduler, IFPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    folder = Path(folder)
    torch.manual_seed(seed)
    tokenizer = tiny_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                           num_heads=4, pad_token_id=tokenizer.pad_token_id,
                                           eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=3, out_channels=6, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"), mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=32, encoder_hid_dim=32, attention_head_dim=4, addition_embed_type="text",
        addition_embed_type_num_heads=2, cross_attention_norm="group_norm", resnet_time_scale_shift="scale_shift",
        act_fn="gelu", norm_num_groups=4)
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="learned_range", thresholding=True,
                              dynamic_thresholding_ratio=0.95, sample_max_value=1.5, clip_sample=True, clip_sample_range=1.0,
                              prediction_type="epsilon")
    pipe = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, scheduler=scheduler, safety_checker=None,
                      feature_extractor=None, watermarker=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)
    return folder
