#include <cblas.h>
/* OpenBLAS extensions: pin the thread count deliberately (DESIGN.md section 9). */
void openblas_set_num_threads(int num_threads);
int openblas_get_num_threads(void);
