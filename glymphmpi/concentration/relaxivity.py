"""Longitudinal relaxivity r1 of common gadolinium agents, in L/(mmol s).

Every value is measured in human plasma at 37 C by Rohrer M, Bauer H, Mintorovitch J,
Requardt M, Weinmann HJ, "Comparison of magnetic properties of MRI contrast media solutions at
different magnetic field strengths", Invest Radiol 40(11):715-724, 2005
(doi:10.1097/01.rli.0000184756.66360.d3); the same numbers are tabulated in the
``dcmri`` package (``dcmri.relaxivity``), against which they were checked.

Later measurements differ by up to about 15%: Szomolanyi P et al., Invest Radiol 54:559-564
(2019), human plasma 37 C, give gadobutrol 4.78 (1.5 T) and 4.97 (3 T), gadoterate 3.32 and 3.00.
The medium matters: the tracer of a glymphatic study sits in CSF and interstitial fluid, with
less protein than plasma, where r1 is lower (the Oslo group's pipelines use 3.2 L/(mmol s)
for gadobutrol at 3 T). Pass ``--r1`` to use such a value; the table's medium is recorded in
every derivative that uses it.
"""

from __future__ import annotations

import re

from glymphmpi.errors import InputError

SOURCE = "Rohrer et al., Invest Radiol 40:715-724 (2005), human plasma, 37 C"

#: agent -> field strength (T) -> r1 in L/(mmol s)
R1_TABLE: dict[str, dict[float, float]] = {
    # gadobutrol (Gadovist, Gadavist): Rohrer 2005, plasma 37 C
    "gadobutrol": {1.5: 5.2, 3.0: 5.0},
    # gadoterate meglumine (Dotarem, Clariscan): Rohrer 2005, plasma 37 C
    "gadoterate": {1.5: 3.6, 3.0: 3.5},
    # gadopentetate dimeglumine (Magnevist, Gd-DTPA): Rohrer 2005, plasma 37 C
    "gadopentetate": {1.5: 4.1, 3.0: 3.7},
}

#: other names seen in ContrastBolusIngredient / the ce- entity (lower case, letters and digits only)
ALIASES = {
    "gadovist": "gadobutrol", "gadavist": "gadobutrol", "gdbtdo3a": "gadobutrol", "gadobutrol": "gadobutrol",
    "dotarem": "gadoterate", "clariscan": "gadoterate", "gddota": "gadoterate", "gadoteratemeglumine": "gadoterate",
    "gadoteric": "gadoterate", "gadotericacid": "gadoterate", "gadoterate": "gadoterate",
    "magnevist": "gadopentetate", "gddtpa": "gadopentetate", "gadopentetatedimeglumine": "gadopentetate",
    "gadopentetic": "gadopentetate", "gadopenteticacid": "gadopentetate", "gadopentetate": "gadopentetate",
}

#: how far a scanner's nominal field may be from the table's (2.89 T Siemens "3 T" systems)
FIELD_TOL_T = 0.25


def normalise_agent(name: str) -> str | None:
    """The table's name of an agent (``Gd-DOTA`` -> ``gadoterate``), or None when unknown."""
    key = re.sub(r"[^a-z0-9]", "", str(name).lower())
    return ALIASES.get(key)


def lookup_r1(agent: str | None, field_T: float | None, where: str = "") -> tuple[float, str]:
    """r1 in L/(mmol s) and a sentence saying where it came from.

    Raises:
        InputError: unknown agent or field strength (the message lists what is known and says
            to pass ``--r1``).
    """
    known = ", ".join(sorted(R1_TABLE))
    if agent is None:
        raise InputError(f"the contrast agent is not known (no ce- entity, no ContrastBolusIngredient); "
                         f"give --agent ({known}) or --r1", where or None)
    name = normalise_agent(agent)
    if name is None:
        raise InputError(f"unknown contrast agent {agent!r} (known: {known}); give its relaxivity with --r1",
                         where or None)
    if field_T is None:
        raise InputError("MagneticFieldStrength is missing from the sidecar; give --field-strength or --r1",
                         where or None)
    for f, r1 in R1_TABLE[name].items():
        if abs(float(field_T) - f) <= FIELD_TOL_T:
            return r1, f"{name} at {f:g} T (scanner {float(field_T):g} T): {r1} L/(mmol s), {SOURCE}"
    fields = ", ".join(f"{f:g} T" for f in R1_TABLE[name])
    raise InputError(f"no r1 for {name} at {float(field_T):g} T in the table (has {fields}); give --r1",
                     where or None)
