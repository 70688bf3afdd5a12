"""The built-in rewards, registered as data (name, facts, where the factory lives).

Adding a built-in reward: write its module, then add one ``register(RewardInfo(...),
"module:Factory")`` line here (the module relative to ``visalign.rewards``).  Nothing here imports
model code.  A package outside visalign registers its rewards with
:func:`visalign.rewards.register` and absolute targets instead (docs/rewards.md).
"""

from .base import RewardInfo
from .registry import register

# (entries are added by each reward's author; keep them sorted by name)
_I, _IP, _IR, _V = ("images",), ("images", "prompts"), ("images", "references"), "video"
register(RewardInfo("aesthetic", "v2", "Apache-2.0 AND MIT", "image", _I, (1.0, 10.0), differentiable=True, weights="OpenAI CLIP ViT-L/14 (open_clip 'openai') + sac+logos+ava1-l14-linearMSE.pth (github christophschuhmann/improved-aesthetic-predictor)", description="LAION aesthetic predictor v2: affine head on the normalised CLIP image embedding"), "clip_rewards:aesthetic")
register(RewardInfo("artifact", "1", "none", "image", _I, (-1.0, 0.0), weights="none", description="penalty from weight-free hack detectors: over-saturation, clipped exposure, periodic grid, flat regions, low entropy"), "artifact:artifact")
register(RewardInfo("clipscore", "1", "MIT", "image", _IP, (0.0, 100.0), differentiable=True, weights="any CLIP; default OpenAI ViT-L/14 (open_clip 'openai')", description="CLIPScore: scale * max(cos(image, text), 0), scale 100 (torchmetrics) or 2.5 (Hessel et al.)"), "clip_rewards:clipscore")
register(RewardInfo("diversity", "1", "Apache-2.0", "image", _I, (0.0, 2.0), differentiable=True, weights="facebook/dinov2-base (or an open_clip / transformers CLIP)", description="within-group diversity bonus: mean (or min) cosine distance of DINO/CLIP features to the other samples of the prompt group; add to a reward against mode collapse"), "guards:diversity")
register(RewardInfo("dino", "v2", "Apache-2.0", "image", _IR, (-1.0, 1.0), differentiable=True, weights="facebook/dinov2-{small,base,large}", description="DINOv2 cosine similarity to reference images (CLS or mean-patch pooling): subject / identity consistency"), "dino:dino")
register(RewardInfo("head", "1", "as trained", "image", _IP, (float("-inf"), float("inf")), differentiable=True, weights="a folder written by `visalign rewards train` (head:path=DIR)", description="a reward head trained with the kit on your labels (pairs, ratings or binary labels): ensemble mean, components uncertainty (ensemble std) and raw"), "head:head")
register(RewardInfo("hpsv2", "v2.1", "Apache-2.0", "image", _IP, (0.2, 0.35), differentiable=True, weights="xswu/HPSv2 HPS_v2.1_compressed.pt (open_clip ViT-H-14)", description="Human Preference Score v2/v2.1: cosine of letterboxed open_clip ViT-H/14 embeddings"), "clip_rewards:hpsv2")
register(RewardInfo("jpeg_compressibility", "1", "none", "image", _I, (-200.0, 0.0), weights="none", description="DDPO: -(JPEG size in kB at quality 95)"), "jpeg:jpeg_compressibility")
register(RewardInfo("jpeg_incompressibility", "1", "none", "image", _I, (0.0, 200.0), weights="none", description="DDPO: +(JPEG size in kB at quality 95)"), "jpeg:jpeg_incompressibility")
register(RewardInfo("pickscore", "v1", "NOASSERTION", "image", _IP, (16.0, 26.0), differentiable=True, weights="yuvalkirstain/PickScore_v1 + processor laion/CLIP-ViT-H-14-laion2B-s32B-b79K", description="PickScore: logit_scale.exp() * cos(image, text) of a CLIP-H fine-tuned on Pick-a-Pic"), "clip_rewards:pickscore")
register(RewardInfo("remote", "1", "as served", "image,video", _I, (float("-inf"), float("inf")), weights="a reward server (visalign rewards serve)", description="any reward served by `visalign rewards serve`, over HTTP: remote:url=http://host:8700,name=NAME; not differentiable"), "remote:remote")
register(RewardInfo("temporal_consistency", "1", "Apache-2.0", _V, _I, (0.0, 1.0), differentiable=True, weights="facebook/dinov2-base (or an open_clip CLIP)", description="VBench-style consistency: DINO/CLIP similarity of adjacent frames and to the first frame"), "video:temporal_consistency")
register(RewardInfo("uncertainty_penalty", "1", "as wrapped", "image", _I, (float("-inf"), float("inf")), differentiable=True, weights="as wrapped", description="a reward minus kappa times its uncertainty component (ensemble std): uncertainty_penalty:reward=head,path=DIR,kappa=1"), "guards:uncertainty_penalty")
register(RewardInfo("video_frames", "1", "as wrapped", _V, _I, (float("-inf"), float("inf")), differentiable=True, weights="as wrapped", description="any image reward on sampled frames of a video, mean or min over frames (video_frames:reward=aesthetic,frames=8)"), "video:video_frames")


def catalog_table() -> str:
    """The catalogue as a markdown table (what ``visalign rewards`` prints)."""
    from .registry import available

    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    rows = [
        "| reward | inputs | range | differentiable | licence | weights | description |",
        "|---|---|---|---|---|---|---|",
    ]
    for i in available():
        lo, hi = i.native_range
        rows.append(
            f"| {cell(i.name)} | {cell(', '.join(i.inputs))} ({i.modality}) | {lo:g} .. {hi:g} | "
            f"{'yes' if i.differentiable else 'no'} | {cell(i.licence)} | {cell(i.weights)} | {cell(i.description)} |"
        )
    return "\n".join(rows)
