"""`ldm-ui`, the local web app: `engine` loads pipelines and generates (no gradio), `infotext` writes and reads the
PNG `parameters` text, `runs` reads a training run folder, `app` lays out the gradio page and its command line."""
