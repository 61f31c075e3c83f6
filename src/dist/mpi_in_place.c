/* MPI_IN_PLACE is a macro whose value differs between MPI implementations (Open MPI,
   MPICH) and rsmpi does not export it: this returns the value of the mpi.h we build
   against. */
#include <mpi.h>

void *algpt2_mpi_in_place(void) { return MPI_IN_PLACE; }
