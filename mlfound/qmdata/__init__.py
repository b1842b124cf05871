"""Generate real multi-fidelity QM datasets (RDKit + tblite xTB MD + PySCF/tblite labels).

Needs the optional extra ``mlfound[qm]`` (tblite, pyscf, rdkit). Imported only by
the command that makes the datasets; the rest of mlfound never needs a QM code.
"""
