"""Registrations of the VLM-based rewards, ImageReward and the reward anchors (HPSv3,
UnifiedReward, VideoReward), kept apart from catalog.py so the two can be edited independently.
Imports no model code."""

from .base import RewardInfo
from .registry import register

# Chat VLMs (Qwen2-VL / Qwen2.5-VL / LLaVA-1.5 through transformers); the licence is the default model's.
register(
    RewardInfo(name="artifact-vlm", version="1", licence="Apache-2.0", modality="image", inputs=("images",),
               native_range=(0.0, 1.0), differentiable=True, weights="Qwen/Qwen2.5-VL-7B-Instruct",
               description="P(no artifact) per MagicMirror-style category (anatomy, structure, texture, ...) from a VLM"),
    "vlm_artifact:artifact_vlm",
)
register(
    RewardInfo(name="imagereward", version="1.0", licence="Apache-2.0", modality="image", inputs=("images", "prompts"),
               native_range=(-2.5, 2.0), differentiable=True, weights="THUDM/ImageReward (ImageReward.pt)",
               description="ImageReward (Xu et al. 2023): BLIP ViT-L + BERT cross-attention + MLP, human preference"),
    "imagereward:imagereward",
)
# Any VLM behind an OpenAI-compatible chat server (vLLM, SGLang, transformers serve): its licence is the served model's.
register(
    RewardInfo(name="vlm-api", version="1", licence="as served", modality="image", inputs=("images", "prompts"),
               native_range=(0.0, 1.0), differentiable=False, weights="the model of an OpenAI-compatible chat server",
               description="VQAScore or the 1-5 rubric asked over an OpenAI-compatible chat API "
                           "(vlm-api:url=http://host:8000/v1,model=NAME): log-probabilities of the answer, else its "
                           "text; not differentiable"),
    "vlm_api:vlm_api",
)
register(
    RewardInfo(name="vlm-judge", version="1", licence="Apache-2.0", modality="image", inputs=("images", "prompts"),
               native_range=(1.0, 5.0), differentiable=True, weights="Qwen/Qwen2.5-VL-7B-Instruct",
               description="1-5 rubric rating from a chat VLM: expected value over rating tokens, or generate+parse"),
    "vlm:vlm_judge",
)
register(
    RewardInfo(name="vqascore", version="1", licence="Apache-2.0", modality="image", inputs=("images", "prompts"),
               native_range=(0.0, 1.0), differentiable=True, weights="Qwen/Qwen2.5-VL-7B-Instruct",
               description="VQAScore (Lin et al. 2024): P('Yes') to 'Does this figure show \"{prompt}\"?' from a VLM"),
    "vlm:vqascore",
)

# Reward anchors: released reward models loaded strictly in their official layouts (docs/rewards.md,
# "HPSv3, UnifiedReward and VideoReward").
register(
    RewardInfo(name="hpsv3", version="v3", licence="MIT AND Apache-2.0", modality="image", inputs=("images", "prompts"),
               native_range=(0.0, 15.0), differentiable=True,
               weights="MizzenAI/HPSv3 (HPSv3.safetensors) + config/processor of Qwen/Qwen2-VL-7B-Instruct",
               description="HPSv3 (Ma et al. 2025): Qwen2-VL-7B + rm_head read at <|Reward|>; score mu, components sigma"),
    "hpsv3:hpsv3",
)
register(
    RewardInfo(name="unifiedreward", version="qwen-7b", licence="MIT AND Apache-2.0", modality="image",
               inputs=("images", "prompts"), native_range=(1.0, 5.0), differentiable=False,
               weights="CodeGoat24/UnifiedReward-qwen-7b",
               description="UnifiedReward (Wang et al. 2025) point-wise 'Final Score' 1-5: expected over digits, or parsed"),
    "unifiedreward:unifiedreward",
)
register(
    RewardInfo(name="unifiedreward-pair", version="qwen-7b", licence="MIT AND Apache-2.0", modality="image",
               inputs=("images", "prompts", "references"), native_range=(0.0, 1.0), differentiable=False,
               weights="CodeGoat24/UnifiedReward-qwen-7b",
               description="UnifiedReward pair-wise: P(sample preferred over its reference); compare() labels DPO pairs"),
    "unifiedreward:unifiedreward_pair",
)
register(
    RewardInfo(name="videoreward", version="1", licence="MIT AND Apache-2.0", modality="video",
               inputs=("images", "prompts"), native_range=(-6.0, 6.0), differentiable=True,
               weights="KlingTeam/VideoReward (checkpoint-11352/model.pth, LoRA) + Qwen/Qwen2-VL-2B-Instruct config",
               description="VideoReward / VideoAlign (Liu et al. 2025): VQ + MQ + TA at special tokens, normalised"),
    "videoreward:videoreward",
)
