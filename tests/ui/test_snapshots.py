"""Screenshots of `top` on the shop replay, compared with the committed SVGs (pytest-textual-snapshot).

After a deliberate change of the UI: `pytest tests/ui/test_snapshots.py --snapshot-update`, then look at
the new SVGs before committing them.
"""

import pytest

from flowscope.ui.app import HelpScreen
from tests.ui.scenario import press_and_settle, replay_app, replay_finished, screen_still, until

SIZE = (150, 32)


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("flows", []),
        ("pods_by_drops", ["g", "s", "s"]),
        ("drops_view", ["g", "d"]),
        ("detail", ["g", "enter"]),
        ("paused_and_filtered", ["space"]),
        ("help", ["question_mark"]),
    ],
)
def test_screens(snap_compare, shop_replay, name, keys):
    app = replay_app(shop_replay)

    async def run_before(pilot) -> None:
        await replay_finished(app, pilot)
        if name == "paused_and_filtered":
            await pilot.press("slash", *"namespace=shop not port=53")
            await press_and_settle(app, pilot, "enter")
        for key in keys:
            if key == "question_mark":
                await pilot.press(key)
                await until(pilot, lambda: isinstance(app.screen, HelpScreen), "the help screen opens")
            else:
                await press_and_settle(app, pilot, key)
        await screen_still(app, pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)


def test_bad_filter_message(snap_compare, shop_replay):
    app = replay_app(shop_replay)

    async def run_before(pilot) -> None:
        await replay_finished(app, pilot)
        await pilot.press("slash", *"from-verdict=dropped", "enter")
        await screen_still(app, pilot)

    assert snap_compare(app, terminal_size=SIZE, run_before=run_before)
