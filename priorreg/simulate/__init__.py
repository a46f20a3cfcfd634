"""Biomechanical simulation of intra-procedural prostate motion: the regularising distribution.

Hu et al. (2018) regularise a registration network's local displacement fields adversarially
against fields from finite-element (FE) simulations of TRUS-probe-induced prostate motion. This
package makes such fields:

- `params`: the random scenario and the one table of parameter ranges;
- `mesh`: gland-in-tissue geometry with a TRUS probe, meshed by gmsh;
- `fem`: compressible neo-Hookean solve with scikit-fem (load steps, Newton);
- `fields`: inverse displacement fields on a real TRUS label's grid, affine removal,
  sampling-domain augmentation;
- `run`: the parallel, reproducible, resumable batch driver (`simulate`);
- `cli`: the `priorreg simulate` sub-command.

Nothing is imported here, so that `priorreg.simulate.cli` loads without the optional `sim`
dependencies (gmsh, scikit-fem) and can say how to install them.
"""
