#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <fcntl.h>
#include <unistd.h>
#include <pthread.h>
#include <string.h>
#include <time.h>
#include <stdatomic.h>
static int fd; static atomic_uint next; static unsigned N;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
static void *run(void *a){ char *b=malloc(65536); memset(b,1,65536);
  unsigned i; while((i=atomic_fetch_add(&next,1))<N){ if(pwrite(fd,b,65536,(off_t)i*65536)!=65536) abort(); } return NULL;}
int main(int c,char**v){ int th=atoi(v[2]); N=atoi(v[3]); fd=open(v[1],O_RDWR|O_CREAT|(atoi(v[4])?O_TRUNC:0),0600);
 pthread_t t[64]; double t0=now(); for(int i=0;i<th;i++)pthread_create(&t[i],0,run,0); for(int i=0;i<th;i++)pthread_join(t[i],0);
 double d=now()-t0; printf("%d threads: %u x 64K in %.3fs = %.0f MB/s, %.0f us/write\n",th,N,d,N*65536/d/1e6,d*1e6/N); }
