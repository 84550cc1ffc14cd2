"""FAISS's on-disk merge of inverted lists: index parts, or an index and a delta, into one ``merged.ivfdata``."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


def merge_into(trained: Any, sources: Sequence[Any], ivfdata: Path) -> Any:
    """FAISS's on-disk merge: the inverted lists of ``sources`` (index files or in-memory invlists) → ``ivfdata``.

    Sources are memory-mapped, so the parts together may exceed RAM. Ids are kept as added (no shifting).
    """
    import faiss

    keep = []  # indexes whose inverted lists we borrow must outlive the merge
    vec = faiss.InvertedListsPtrVector()
    for s in sources:
        if isinstance(s, (str, Path)):
            idx = faiss.read_index(str(s), faiss.IO_FLAG_MMAP)
        else:
            idx = s
        ivf = faiss.extract_index_ivf(idx)
        keep.append(idx)
        vec.push_back(ivf.invlists)
    ivf_out = faiss.extract_index_ivf(trained)
    if trained.ntotal != 0:
        raise RuntimeError("merge target must be the empty trained index")
    invlists = faiss.OnDiskInvertedLists(ivf_out.nlist, ivf_out.code_size, str(ivfdata))
    ntotal = invlists.merge_from_multiple(vec.data(), vec.size(), False)
    trained.ntotal = ivf_out.ntotal = ntotal
    ivf_out.replace_invlists(invlists, True)
    invlists.this.disown()
    del keep
    return trained
