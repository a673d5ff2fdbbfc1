/* Tasks (threads) of the core: registry, parking, modelled signals (src/_core_task.pxi).
 * Needs pdb_task, pdb_task_of() (pydmabuf/_core_ww.pxd) and pdb_list
 * (pydmabuf/_core_base.pxd) declared first.
 *
 * Included by Cython through `cdef extern from "pdb_task.h"`; static, so each
 * extension module that includes it has its own copy. */
#ifndef PYDMABUF_PDB_TASK_H
#define PYDMABUF_PDB_TASK_H

#include <stdint.h>

#include <time.h>
#include <errno.h>
#include <stdlib.h>

static __thread pdb_task *pdb_tls_task;
static pthread_key_t pdb_task_key;
static int pdb_task_key_ok;
static pthread_mutex_t pdb_tasks_mu = PTHREAD_MUTEX_INITIALIZER;
/* Every task, newest first (pdb_task.node); under pdb_tasks_mu. */
static pdb_list pdb_tasks = { &pdb_tasks, &pdb_tasks };

static int64_t pdb_now_ns_c(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void pdb_task_get_c(pdb_task *t)
{
    __atomic_add_fetch(&t->refs, 1, __ATOMIC_RELAXED);
}

static void pdb_task_put_c(pdb_task *t)
{
    if (__atomic_sub_fetch(&t->refs, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    pthread_mutex_lock(&pdb_tasks_mu);
    pdb_list_del(&t->node);
    pthread_mutex_unlock(&pdb_tasks_mu);
    pthread_cond_destroy(&t->cv);
    pthread_mutex_destroy(&t->mu);
    free(t);
}

/* Thread exit.  A thread that dies holding ww mutexes keeps its task
   (the mutexes still name it as their owner, as a dead task would in
   the kernel); otherwise the thread's reference goes. */
static void pdb_task_exit(void *p)
{
    pdb_task *t = (pdb_task *)p;
    __atomic_store_n(&t->alive, 0, __ATOMIC_SEQ_CST);
    if (t->held_total == 0)
        pdb_task_put_c(t);
}

static int pdb_task_init_key(void)
{
    if (pthread_key_create(&pdb_task_key, pdb_task_exit) != 0)
        return -1;
    pdb_task_key_ok = 1;
    return 0;
}

static pdb_task *pdb_task_new_current(void)
{
    pthread_condattr_t attr;
    pdb_task *t = (pdb_task *)calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    pthread_mutex_init(&t->mu, NULL);
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&t->cv, &attr);
    pthread_condattr_destroy(&attr);
    t->refs = 1;
    t->alive = 1;
    t->ident = PyThread_get_thread_ident();
    pthread_mutex_lock(&pdb_tasks_mu);
    pdb_list_add(&t->node, &pdb_tasks);
    pthread_mutex_unlock(&pdb_tasks_mu);
    if (pdb_task_key_ok)
        pthread_setspecific(pdb_task_key, t);
    pdb_tls_task = t;
    return t;
}

static inline pdb_task *pdb_task_current_c(void)
{
    pdb_task *t = pdb_tls_task;
    return t ? t : pdb_task_new_current();
}

static inline pdb_task *pdb_task_peek_c(void)
{
    return pdb_tls_task;
}

static void pdb_wake_c(pdb_task *t)
{
    pthread_mutex_lock(&t->mu);
    t->token = 1;
    pthread_cond_signal(&t->cv);
    pthread_mutex_unlock(&t->mu);
}

static int pdb_park_c(pdb_task *t, int64_t deadline)
{
    int rc = 0;
    pthread_mutex_lock(&t->mu);
    while (!t->token) {
        if (deadline < 0) {
            pthread_cond_wait(&t->cv, &t->mu);
        } else {
            struct timespec ts;
            ts.tv_sec = (time_t)(deadline / 1000000000LL);
            ts.tv_nsec = (long)(deadline % 1000000000LL);
            if (pthread_cond_timedwait(&t->cv, &t->mu, &ts) == ETIMEDOUT) {
                rc = -ETIMEDOUT;
                break;
            }
        }
    }
    t->token = 0;
    pthread_mutex_unlock(&t->mu);
    return rc;
}

/* Make a signal pending for the live thread ``ident`` and wake it. */
static int pdb_signal_ident_c(unsigned long ident)
{
    int found = 0;
    pdb_task *t;
    pthread_mutex_lock(&pdb_tasks_mu);
    for (t = pdb_task_of(pdb_list_first(&pdb_tasks)); t;
         t = pdb_task_of(pdb_list_next(&pdb_tasks, &t->node))) {
        if (t->ident == ident && __atomic_load_n(&t->alive, __ATOMIC_SEQ_CST)) {
            __atomic_store_n(&t->sigpending, 1, __ATOMIC_SEQ_CST);
            pdb_wake_c(t);
            found = 1;
        }
    }
    pthread_mutex_unlock(&pdb_tasks_mu);
    return found;
}

#endif /* PYDMABUF_PDB_TASK_H */
