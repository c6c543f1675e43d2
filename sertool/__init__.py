"""sertool: multimodal (speech + transcript) emotion recognition toolkit.

Stages, each a module reading and writing files (see DESIGN.md):
extract -> align -> train -> distill -> evaluate -> predict.
"""

__version__ = "0.1.0"
