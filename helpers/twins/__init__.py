"""The twins' world and training: the shapes world and its detector (:mod:`.world`), and the trainer
that teaches a tiny twin to draw it (:mod:`.training`); the trained weights ship beside them.
"""
