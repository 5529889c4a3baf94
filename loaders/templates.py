"""Prompt templates for zero-shot classification and segmentation, kept as data.

A class name alone ("dog") is a poor caption; CLIP (Radford et al. 2021) writes it into many
templates ("a photo of a {}.") and averages their text embeddings (prompt ensembling). The zero-shot
segmentation papers (MaskCLIP-trick, SCLIP, ClearCLIP, NACLIP) reuse OpenAI's 80 ImageNet templates
unchanged; the shapes world has its own, built from the phrases of its captions (loaders/shapes.py).
"""

from loaders.shapes import SHAPES_TEMPLATES

# The 80 prompt templates OpenAI used for zero-shot ImageNet (CLIP, Radford et al. 2021), which the
# zero-shot segmentation papers (MaskCLIP-trick, SCLIP, ClearCLIP, NACLIP) reuse unchanged.
OPENAI_TEMPLATES = [
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
]
# The 7-template subset that OpenAI's prompt-engineering notebook found best on ImageNet.
SHORT_TEMPLATES = [
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
]


def get_templates(templates) -> list[str]:
    """"openai" | "short" | "shapes" | a list of strings with "{}" -> the list of templates."""
    if isinstance(templates, str):
        table = {"openai": OPENAI_TEMPLATES, "short": SHORT_TEMPLATES, "shapes": SHAPES_TEMPLATES}
        if templates not in table:
            raise ValueError(f"unknown templates {templates!r}; choose one of {sorted(table)} or pass a list")
        templates = table[templates]
    templates = list(templates)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ValueError(f"templates must be a non-empty list of strings containing '{{}}'; bad: {bad}")
    return templates
