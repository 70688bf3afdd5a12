"""visalign: align image and video generators with rewards.

``import visalign`` is light: it loads no model code.  The pieces live in submodules:

- ``visalign.samplers``  the Sampler contract and the model-family adapters
- ``visalign.rewards``   reward models and composition
- ``visalign.trainers``  training algorithms
- ``visalign.steering``  inference-time steering (no training)
- ``visalign.toy``       the shapes toy world (a plug-in: ``visalign/toy/plugin.py``)
- ``visalign.registry``  the registries of names and plug-in loading (docs/architecture.md, "Plug-ins")
"""

__version__ = "0.1.0"
