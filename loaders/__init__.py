"""Everything that reads the outside world, kept beside the reading path: the shapes world
(shapes.py, which can also write itself to disk in the real layouts), image-text csv and tar shards
(imagetext.py), class-folder trees such as ImageNet's val set (classification.py), segmentation
benchmarks with their layouts and class names (segmentation.py, classnames/), prompt templates
(templates.py), and public CLIP weights in and out (open_clip export) with CLIP's BPE tokenizer
(pretrained.py)."""
