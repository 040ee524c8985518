from embrag.config import MaskConfig, RefreshConfig
from embrag.refresh import RefreshState, after_reencode, after_validation, batch_due, epoch_start

FLAT = MaskConfig(curriculum=(0.5,), epochs_per_level=0)


def _run(refresh, mask, val_f1s):
    state, fired = RefreshState(), []
    for epoch, f1 in enumerate(val_f1s):
        state, reason = epoch_start(state, epoch, refresh, mask)
        if reason:
            fired.append(epoch)
        state = after_reencode(after_validation(state, f1, refresh))
    return state, fired


def test_option_a_every_n_epochs():
    state, fired = _run(RefreshConfig(policy="epochs", every=2), FLAT, [0.5] * 7)
    assert fired == [2, 4, 6]
    assert state.mask_version == 3
    assert state.embedding_version == 7  # re-encoded after every epoch


def test_option_b_batches():
    r = RefreshConfig(policy="batches", every=3)
    assert [b for b in range(10) if batch_due(r, b)] == [3, 6, 9]
    _, fired = _run(r, FLAT, [0.5] * 4)
    assert fired == []  # option B never refreshes at epoch boundaries by itself


def test_option_c_plateau():
    f1 = [0.50, 0.60, 0.60, 0.60, 0.70, 0.70, 0.70]
    state, fired = _run(RefreshConfig(policy="plateau", patience=2, min_delta=0.01), FLAT, f1)
    # no improvement after epochs 2 and 3 -> refresh at the start of epoch 4; then 5, 6 flat -> refresh at 7 (not run)
    assert fired == [4]
    assert state.mask_version == 1


def test_curriculum_change_forces_new_version():
    mask = MaskConfig(curriculum=(0.3, 0.5, 0.7), epochs_per_level=2)
    state, fired = _run(RefreshConfig(policy="plateau", patience=99), mask, [0.5] * 6)
    assert fired == [2, 4]
    assert state.level == 2
