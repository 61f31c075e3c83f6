/* What rsmpi does not give us.

   MPI_IN_PLACE is a macro whose value differs between MPI implementations (Open MPI,
   MPICH) and rsmpi does not export it: this returns the value of the mpi.h we build
   against.

   The bf16 gradient all-reduce (dist.grad_dtype: bf16) needs a sum MPI does not have:
   bf16 values travel as 16-bit words, each pair is added in fp32 and the sum rounded
   back to bf16 (to nearest, ties to even, as libtorch's casts round). */
#include <mpi.h>
#include <stdint.h>
#include <string.h>

void *algpt2_mpi_in_place(void) { return MPI_IN_PLACE; }

static float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        /* NaN stays NaN (quiet), whatever its payload. */
        return (uint16_t)((bits >> 16) | 0x0040u);
    }
    uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)((bits + rounding) >> 16);
}

/* inout[i] = bf16(f32(in[i]) + f32(inout[i])): the element-wise step of the reduction. */
void algpt2_bf16_sum(const uint16_t *in, uint16_t *inout, int n) {
    for (int i = 0; i < n; i++) {
        inout[i] = f32_to_bf16(bf16_to_f32(in[i]) + bf16_to_f32(inout[i]));
    }
}

static void bf16_sum_op(void *in, void *inout, int *len, MPI_Datatype *type) {
    (void)type;
    algpt2_bf16_sum((const uint16_t *)in, (uint16_t *)inout, *len);
}

/* In-place sum of `count` bf16 values at `buf` across `comm`; returns the MPI code. */
int algpt2_allreduce_bf16_sum(void *buf, int count, MPI_Comm comm) {
    static MPI_Op op = MPI_OP_NULL;
    if (op == MPI_OP_NULL) {
        int rc = MPI_Op_create(bf16_sum_op, 1, &op);
        if (rc != MPI_SUCCESS) {
            return rc;
        }
    }
    return MPI_Allreduce(MPI_IN_PLACE, buf, count, MPI_UINT16_T, op, comm);
}

/* Point-to-point pieces of the overlapped exchange's ring all-reduce (src/parallel/ring.rs),
   non-blocking: its thread polls them with short sleeps instead of spinning in a blocking
   call on a core the backward needs. */
int algpt2_isend(const void *buf, int bytes, int dest, int tag, MPI_Comm comm, MPI_Request *request) {
    return MPI_Isend(buf, bytes, MPI_BYTE, dest, tag, comm, request);
}

int algpt2_irecv(void *buf, int bytes, int source, int tag, MPI_Comm comm, MPI_Request *request) {
    return MPI_Irecv(buf, bytes, MPI_BYTE, source, tag, comm, request);
}

/* *done = whether all `n` requests have completed (then they are freed). */
/* Like MPI_Testall for a receive (requests[0]) and a send: once both are done,
   *received is the receive's size in bytes, so that a peer sending fewer bytes than
   expected is seen. An error inside a status (a peer sending more: MPI_ERR_TRUNCATE) is
   returned as that status's code. */
int algpt2_testall(int n, MPI_Request *requests, int *done, int *received) {
    MPI_Status statuses[2];
    if (n < 1 || n > 2) {
        return MPI_ERR_COUNT;
    }
    int rc = MPI_Testall(n, requests, done, statuses);
    if (rc == MPI_ERR_IN_STATUS) {
        for (int i = 0; i < n; i++) {
            if (statuses[i].MPI_ERROR != MPI_SUCCESS) {
                return statuses[i].MPI_ERROR;
            }
        }
    }
    if (rc == MPI_SUCCESS && *done) {
        rc = MPI_Get_count(&statuses[0], MPI_BYTE, received);
    }
    return rc;
}

/* A communicator whose errors come back as codes instead of ending the job, so that a
   receive of the wrong size is an error that names the rank. */
int algpt2_errors_return(MPI_Comm comm) { return MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN); }

/* MPI's words for an error code. */
void algpt2_error_string(int code, char *text, int *len) {
    if (MPI_Error_string(code, text, len) != MPI_SUCCESS) {
        *len = 0;
    }
}
