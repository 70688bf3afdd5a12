"""``visalign.configs``: the recipes that ship with visalign (package data).

The YAML files below this folder are installed with the package, so ``visalign recipes`` lists them
and ``visalign train toy/nft_cn`` (or ``visalign steer steer/toy_fk``) runs one by name from any
folder.  :mod:`visalign.recipes` finds and lists them.
"""
