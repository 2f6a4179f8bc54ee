"""Learned (dual-path) lossless coding of image frames.

A frame of ``bits`` bits is split at bit plane ``s`` (:mod:`.bitplanes`) into a *global* part
(the high ``bits - s`` planes: structure) and a *local* part (the low ``s`` planes: texture and
noise). The global part is coded by :mod:`.global_path` (or by pred-v2); the local part by the
language model of :mod:`.local_path`, prompted with the already decoded global part.
"""
