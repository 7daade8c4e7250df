"""Weights that do not fit the fast tier, fetched as they compute: what stays resident and what streams
in which pieces (:mod:`.plan`), and the streamers that read them ahead, from the disk or pinned RAM
(:mod:`.streamers`).
"""
