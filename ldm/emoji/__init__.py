"""A real captioned image set and its judge: Twemoji's PNGs from npm with their names as captions (`data`,
`python -m ldm.emoji.data`), and nearest-neighbour retrieval of a model's samples among the training images
(`retrieval`)."""
