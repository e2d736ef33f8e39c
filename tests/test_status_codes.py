"""convscale.status: the one place of run statuses and exit codes (the values scripts rely on)."""

from __future__ import annotations

from convscale import status


def test_exit_codes_and_statuses_keep_their_values():
    assert (status.EXIT_DONE, status.EXIT_FAILED, status.EXIT_USER_ERROR, status.EXIT_DIVERGED,
            status.EXIT_INTERRUPTED) == (0, 1, 2, 3, 130)
    assert status.FINISHED == ("done", "diverged")
    assert (status.RUNNING, status.FAILED, status.PENDING, status.INTERRUPTED) == ("running", "failed", "pending",
                                                                                 "interrupted")


def test_every_stage_reads_the_same_constants():
    import convscale.cli.finetune
    import convscale.cli.train
    import convscale.sweep.results
    import convscale.sweep.sweepdir
    import convscale.train
    from convscale.errors import UserError

    assert UserError.exit_code == status.EXIT_USER_ERROR
    assert convscale.train.EXIT_DIVERGED == convscale.cli.train.EXIT_DIVERGED == convscale.cli.finetune.EXIT_DIVERGED \
        == status.EXIT_DIVERGED
    assert convscale.sweep.sweepdir.FINISHED is status.FINISHED
    assert set(convscale.sweep.results.STATUSES) == {*status.FINISHED, status.FAILED, status.PENDING}
