"""Everything that reads the outside world, kept beside the reading path: the shapes world
(shapes.py), image-text csv and tar shards (imagetext.py), segmentation benchmarks with their
layouts and class names (segmentation.py, classnames/), prompt templates (templates.py), and public
CLIP weights with CLIP's BPE tokenizer (pretrained.py)."""
