"""Atari-57: the 57 Atari games of DeepMind's Atari papers, with their reference scores,
and the `atari57` suite (mirrors impala/dmlab30.py).

Source of the table: google-deepmind/dqn_zoo, dqn_zoo/atari_data.py (random and
human scores used across DeepMind's Atari papers: undiscounted returns, episodes
capped at 108,000 frames, up to 30 no-op starts), as collected in the project's
reference table `shared/reference/atari57.json`. This module is the project's own
copy; nothing reads the shared table at run time.

The suite `--level_name=atari57` is the 57 games as ALE v5 ids (`ALE/Pong-v5`), in
the table's order (alphabetical by its snake_case key): actor i plays LEVELS[i % 57].
The installed ale-py registers all 57 ids (tests/test_scores.py checks).
"""

from __future__ import annotations

import re

SUITE_NAME = "atari57"

# Atari-57: game -> (random, human), keyed by the table's snake_case names.
ATARI57: dict[str, tuple[float, float]] = {
    "alien": (227.8, 7127.7),
    "amidar": (5.8, 1719.5),
    "assault": (222.4, 742.0),
    "asterix": (210.0, 8503.3),
    "asteroids": (719.1, 47388.7),
    "atlantis": (12850.0, 29028.1),
    "bank_heist": (14.2, 753.1),
    "battle_zone": (2360.0, 37187.5),
    "beam_rider": (363.9, 16926.5),
    "berzerk": (123.7, 2630.4),
    "bowling": (23.1, 160.7),
    "boxing": (0.1, 12.1),
    "breakout": (1.7, 30.5),
    "centipede": (2090.9, 12017.0),
    "chopper_command": (811.0, 7387.8),
    "crazy_climber": (10780.5, 35829.4),
    "defender": (2874.5, 18688.9),
    "demon_attack": (152.1, 1971.0),
    "double_dunk": (-18.6, -16.4),
    "enduro": (0.0, 860.5),
    "fishing_derby": (-91.7, -38.7),
    "freeway": (0.0, 29.6),
    "frostbite": (65.2, 4334.7),
    "gopher": (257.6, 2412.5),
    "gravitar": (173.0, 3351.4),
    "hero": (1027.0, 30826.4),
    "ice_hockey": (-11.2, 0.9),
    "jamesbond": (29.0, 302.8),
    "kangaroo": (52.0, 3035.0),
    "krull": (1598.0, 2665.5),
    "kung_fu_master": (258.5, 22736.3),
    "montezuma_revenge": (0.0, 4753.3),
    "ms_pacman": (307.3, 6951.6),
    "name_this_game": (2292.3, 8049.0),
    "phoenix": (761.4, 7242.6),
    "pitfall": (-229.4, 6463.7),
    "pong": (-20.7, 14.6),
    "private_eye": (24.9, 69571.3),
    "qbert": (163.9, 13455.0),
    "riverraid": (1338.5, 17118.0),
    "road_runner": (11.5, 7845.0),
    "robotank": (2.2, 11.9),
    "seaquest": (68.4, 42054.7),
    "skiing": (-17098.1, -4336.9),
    "solaris": (1236.3, 12326.7),
    "space_invaders": (148.0, 1668.7),
    "star_gunner": (664.0, 10250.0),
    "surround": (-10.0, 6.5),
    "tennis": (-23.8, -8.3),
    "time_pilot": (3568.0, 5229.2),
    "tutankham": (11.4, 167.6),
    "up_n_down": (533.4, 11693.2),
    "venture": (0.0, 1187.5),
    "video_pinball": (16256.9, 17667.9),
    "wizard_of_wor": (563.5, 4756.5),
    "yars_revenge": (3092.9, 54576.9),
    "zaxxon": (32.5, 9173.3),
}

# ALE's CamelCase game names -> the table's keys, written out rather than derived, so
# that look-alikes (Pitfall2, Atlantis2, Pacman vs MsPacman) can never match by accident.
ALE_GAMES: dict[str, str] = {
    "Alien": "alien",
    "Amidar": "amidar",
    "Assault": "assault",
    "Asterix": "asterix",
    "Asteroids": "asteroids",
    "Atlantis": "atlantis",
    "BankHeist": "bank_heist",
    "BattleZone": "battle_zone",
    "BeamRider": "beam_rider",
    "Berzerk": "berzerk",
    "Bowling": "bowling",
    "Boxing": "boxing",
    "Breakout": "breakout",
    "Centipede": "centipede",
    "ChopperCommand": "chopper_command",
    "CrazyClimber": "crazy_climber",
    "Defender": "defender",
    "DemonAttack": "demon_attack",
    "DoubleDunk": "double_dunk",
    "Enduro": "enduro",
    "FishingDerby": "fishing_derby",
    "Freeway": "freeway",
    "Frostbite": "frostbite",
    "Gopher": "gopher",
    "Gravitar": "gravitar",
    "Hero": "hero",
    "IceHockey": "ice_hockey",
    "Jamesbond": "jamesbond",
    "Kangaroo": "kangaroo",
    "Krull": "krull",
    "KungFuMaster": "kung_fu_master",
    "MontezumaRevenge": "montezuma_revenge",
    "MsPacman": "ms_pacman",
    "NameThisGame": "name_this_game",
    "Phoenix": "phoenix",
    "Pitfall": "pitfall",
    "Pong": "pong",
    "PrivateEye": "private_eye",
    "Qbert": "qbert",
    "Riverraid": "riverraid",
    "RoadRunner": "road_runner",
    "Robotank": "robotank",
    "Seaquest": "seaquest",
    "Skiing": "skiing",
    "Solaris": "solaris",
    "SpaceInvaders": "space_invaders",
    "StarGunner": "star_gunner",
    "Surround": "surround",
    "Tennis": "tennis",
    "TimePilot": "time_pilot",
    "Tutankham": "tutankham",
    "UpNDown": "up_n_down",
    "Venture": "venture",
    "VideoPinball": "video_pinball",
    "WizardOfWor": "wizard_of_wor",
    "YarsRevenge": "yars_revenge",
    "Zaxxon": "zaxxon",
}


# A game's level names: `ALE/Pong-v5` (any version), and the legacy `PongNoFrameskip-v4`,
# `Pong-v4`, `PongDeterministic-v4` (and their `-ram` forms).
_ALE_ID = re.compile(r"^ALE/(?P<game>[A-Za-z0-9]+?)(?:-ram)?-v\d+$")
_LEGACY_ID = re.compile(r"^(?P<game>[A-Za-z0-9]+?)(?:-ram)?(?:NoFrameskip|Deterministic)?-v\d+$")


_ALE_NAME: dict[str, str] = {key: game for game, key in ALE_GAMES.items()}

# The suite, in the table's order: actor i plays LEVELS[i % 57].
LEVELS: tuple[str, ...] = tuple(f"ALE/{_ALE_NAME[key]}-v5" for key in ATARI57)


def game(level_name: str) -> str | None:
    """The table key of an ALE level id (`ALE/Pong-v5` -> "pong"), or None."""
    match = _ALE_ID.match(level_name) or _LEGACY_ID.match(level_name)
    if match is None:
        return None
    return ALE_GAMES.get(match.group("game"))
