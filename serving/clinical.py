"""Short, factual clinical context for each label the models can output.

Shown next to a prediction so a lab user can read the result in context. It is general
reference text (typical adult values), not advice: every entry carries the same note.
Labels are matched case-insensitively; the leukemia spec's task labels (normal/abnormal)
and class folders, the eight PBC cell types, and the four common WBC-dataset labels are
covered.
"""

from __future__ import annotations

SCREENING_NOTE = (
    "Screening aid, not a diagnosis: a trained morphologist must review the smear, and results "
    "must be read with the blood count, flow cytometry and the clinical picture."
)

# label -> (title, what it is, normal share of white cells or None, what an increase can mean)
_CONTEXT: dict[str, tuple[str, str, str | None, str]] = {
    "normal": (
        "No leukemic blasts suspected",
        "The model found the field closest to benign hematogones (normal B-lymphocyte precursors), "
        "which are common in children's marrow and during recovery after chemotherapy.",
        None,
        "Hematogones can rise after chemotherapy, infection or marrow regeneration and mimic "
        "blasts; a normal screen does not exclude leukemia in cells that were not imaged.",
    ),
    "abnormal": (
        "Lymphoblasts suspected (B-ALL pattern)",
        "The model found features of malignant B-lymphoblasts as seen in acute lymphoblastic "
        "leukemia (early pre-B, pre-B or pro-B subtypes).",
        None,
        "Blasts are normally absent from peripheral blood. Suspected blasts call for urgent "
        "review of the smear, a full blood count and immunophenotyping by flow cytometry.",
    ),
    "benign": (
        "Hematogones (benign B-cell precursors)",
        "Normal immature B-lymphocytes of the bone marrow; they look similar to lymphoblasts.",
        None,
        "Increased after chemotherapy, transplantation, infections and in young children; "
        "usually not a sign of disease.",
    ),
    "early": (
        "Early pre-B ALL",
        "Lymphoblasts of an early stage of B-cell development (a B-ALL subtype).",
        None,
        "Blasts in blood suggest acute leukemia; confirmation needs marrow examination and "
        "immunophenotyping.",
    ),
    "pre": (
        "Pre-B ALL",
        "Lymphoblasts at the pre-B stage (a B-ALL subtype).",
        None,
        "Blasts in blood suggest acute leukemia; confirmation needs marrow examination and "
        "immunophenotyping.",
    ),
    "pro": (
        "Pro-B ALL",
        "Lymphoblasts at the earliest (pro-B) stage of B-cell development (a B-ALL subtype).",
        None,
        "Blasts in blood suggest acute leukemia; pro-B ALL is often associated with KMT2A "
        "rearrangements and needs specialist work-up.",
    ),
    "neutrophil": (
        "Neutrophil",
        "The most common white cell: a granulocyte with a segmented nucleus that engulfs bacteria.",
        "about 40-70 % of white cells",
        "Neutrophilia is seen in bacterial infection, inflammation, tissue damage, stress, "
        "corticosteroids and myeloproliferative disorders.",
    ),
    "lymphocyte": (
        "Lymphocyte",
        "A small round cell with a dense nucleus and thin cytoplasm: B, T and NK cells of immunity.",
        "about 20-40 % of white cells",
        "Lymphocytosis is seen in viral infections (e.g. mononucleosis), pertussis and chronic "
        "lymphocytic leukemia or lymphoma.",
    ),
    "monocyte": (
        "Monocyte",
        "The largest white cell, with a folded nucleus; it becomes a macrophage in tissues.",
        "about 2-10 % of white cells",
        "Monocytosis is seen in chronic infections (e.g. tuberculosis), recovery from "
        "neutropenia, autoimmune disease and chronic myelomonocytic leukemia.",
    ),
    "eosinophil": (
        "Eosinophil",
        "A granulocyte with a bilobed nucleus and large orange-red granules.",
        "about 1-4 % of white cells",
        "Eosinophilia is seen in allergy, asthma, parasitic infection, drug reactions and some "
        "myeloid neoplasms.",
    ),
    "basophil": (
        "Basophil",
        "The rarest granulocyte, with dark purple granules that hide the nucleus (histamine).",
        "under 1 % of white cells",
        "Basophilia is uncommon; it is typical of chronic myeloid leukemia and other "
        "myeloproliferative neoplasms, and seen in some allergic reactions.",
    ),
    "ig": (
        "Immature granulocytes",
        "Promyelocytes, myelocytes and metamyelocytes: neutrophil precursors normally kept in "
        "the bone marrow.",
        "normally under about 1 % of white cells in adults",
        "More immature granulocytes in blood (left shift) are seen in severe infection or sepsis, "
        "pregnancy, marrow stimulation (G-CSF) and myeloproliferative disorders.",
    ),
    "erythroblast": (
        "Erythroblast (nucleated red blood cell)",
        "A red-cell precursor that still has its nucleus; normally confined to the bone marrow.",
        "normally absent in adult blood (present in newborns)",
        "Circulating erythroblasts are seen in severe anaemia or haemolysis, hypoxia, marrow "
        "infiltration or fibrosis, and after splenectomy.",
    ),
    "platelet": (
        "Platelet (thrombocyte)",
        "A small cell fragment from megakaryocytes that starts blood clotting; not a white cell.",
        None,
        "A raised platelet count is often reactive (inflammation, iron deficiency, bleeding) "
        "and can be an essential thrombocythemia or another myeloproliferative neoplasm.",
    ),
}


def context_for(label: str) -> dict[str, str | None]:
    """The context entry for `label` (a generic entry for labels without one)."""
    entry = _CONTEXT.get(label.strip().lower())
    if entry is None:
        return {
            "label": label,
            "title": label,
            "what": "No reference text is available for this class.",
            "normal_share": None,
            "increase": "",
            "note": SCREENING_NOTE,
        }
    title, what, share, increase = entry
    return {"label": label, "title": title, "what": what, "normal_share": share, "increase": increase,
            "note": SCREENING_NOTE}


def known_labels() -> list[str]:
    return sorted(_CONTEXT)
