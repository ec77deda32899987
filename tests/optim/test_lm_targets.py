"""soulkit.optim.lm_targets: the next-token label shift, against a hand computation."""

import pytest
import torch

from soulkit.optim.lm_targets import causal_lm_targets


def test_targets_are_the_next_labels_by_hand():
    labels = torch.tensor([[-100, -100, 11, 12, 13],
                           [-100, 21, 22, -100, -100]])
    assert causal_lm_targets(labels).tolist() == [[-100, 11, 12, 13, -100],
                                                   [21, 22, -100, -100, -100]]
    assert causal_lm_targets(labels, ignore_index=-1).tolist() == [[-100, 11, 12, 13, -1],
                                                                    [21, 22, -100, -100, -1]]
    assert causal_lm_targets(labels, drop_last=True).tolist() == [[-100, 11, 12, 13],
                                                                   [21, 22, -100, -100]]
    # the two forms agree where both have a target
    assert torch.equal(causal_lm_targets(labels)[:, :-1], causal_lm_targets(labels, drop_last=True))


def test_any_leading_shape_and_bad_input():
    labels = torch.arange(24).reshape(2, 3, 4)
    assert torch.equal(causal_lm_targets(labels, drop_last=True), labels[..., 1:])
    assert causal_lm_targets(torch.tensor([7])).tolist() == [-100]
    for bad in (torch.tensor(3), [1, 2, 3]):
        with pytest.raises(ValueError, match=r"shape \[\.\.\., seq_len\]"):
            causal_lm_targets(bad)
