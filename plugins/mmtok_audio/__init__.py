"""The first-party audio plugin: sound files and a neural-codec tokenizer at 3 kbit/s.

Registered through the ``mmtok`` entry-point group like any third-party plugin.
"""

import mmtok

from mmtok_audio.modality import AudioModality
from mmtok_audio.tokenizer import AudioTokenizer, HarmonicAudioTokenizer, SEANetAudioTokenizer, SpectralAudioTokenizer

__all__ = [
    "AudioModality",
    "AudioTokenizer",
    "HarmonicAudioTokenizer",
    "SEANetAudioTokenizer",
    "SpectralAudioTokenizer",
    "register_modalities",
]


@mmtok.hookimpl
def register_modalities(register):
    register(AudioModality())
