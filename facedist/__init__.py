"""facedist: 3D-morphable-model face analysis at scale on Ray."""

import os as _os

# A relative FACEDIST_MODEL_DIR / FACEDIST_CACHE_DIR means relative to where the user started the
# command; Ray workers (Train's especially) run elsewhere, so pin them down before any worker starts.
for _name in ("FACEDIST_MODEL_DIR", "FACEDIST_CACHE_DIR"):
    _value = _os.environ.get(_name)
    if _value and not _os.path.isabs(_os.path.expanduser(_value)):
        _os.environ[_name] = _os.path.abspath(_os.path.expanduser(_value))


class SettingsError(ValueError):
    """Settings that cannot work together (a flag combination, an output made with other
    settings), found before any work starts; the message says what to do instead."""
