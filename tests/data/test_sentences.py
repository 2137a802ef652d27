"""The repository's sentence sets: the held-out one shares no line with the calibration one."""

from tqc.compiler.analysis.calib_data import read_sentences

from ..conftest import CALIB_SENTENCES, HELDOUT_SENTENCES


def test_held_out_sentences_are_apart_from_the_calibration_ones():
    calib, held_out = read_sentences(CALIB_SENTENCES), read_sentences(HELDOUT_SENTENCES)
    assert len(calib) == 64 and len(held_out) == 256 and len(set(held_out)) == 256
    assert not set(calib) & set(held_out)
