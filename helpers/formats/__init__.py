"""How weights are stored and read: checkpoint folders, GGUF and single files (:mod:`.sources`), the
codecs of bf16, fp8 with row scales and GGUF blocks (:mod:`.codecs`, :mod:`.quants`), a transformer
held as one file in BFL's layout (:mod:`.transformer_file`), and copies in another format (:mod:`.convert`).
"""
