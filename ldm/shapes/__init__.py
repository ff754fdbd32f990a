"""The offline shapes world: captioned synthetic images, a detector that reads them back, adherence scoring.

`synthetic` writes the dataset (`python -m ldm.shapes.synthetic`), `detector` reads shape, colour and position from
pixels, `adherence` samples held-out prompts and scores them, `text_stack` builds a tokenizer and text encoder for
the captions and assembles a base pipeline folder (`python -m ldm.shapes.text_stack`).
"""
