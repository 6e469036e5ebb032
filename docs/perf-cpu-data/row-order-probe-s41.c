#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static size_t RB,NL; static uint8_t* buf; static size_t NR; static int* lst; static int* ord; static size_t nl;
static __m256i readrow(const uint8_t* p,__m256i acc){
  for(size_t o=0;o<RB;o+=32) acc=_mm256_add_epi8(acc,_mm256_loadu_si256((const __m256i*)(p+o)));
  return acc; }
/* passes of P kept rows; pass order given by porder[], rows within a pass ascending (rev=0) or descending (rev=1) */
static double run(const int* porder,size_t np,int P,int rev,int dist){
  __m256i acc=_mm256_setzero_si256(); double t0=now();
  for(size_t pi=0;pi<np;pi++){ size_t i=(size_t)porder[pi]*P; size_t e=i+P<nl?i+P:nl;
    if(dist && pi+dist<np){ size_t a=(size_t)porder[pi+dist]*P; size_t ae=a+P<nl?a+P:nl;
      for(size_t l=0;l<RB;l+=64) for(size_t k=a;k<ae;k++) _mm_prefetch((const char*)buf+(size_t)lst[k]*RB+l,_MM_HINT_T1); }
    if(!rev) for(size_t k=i;k<e;k++) acc=readrow(buf+(size_t)lst[k]*RB,acc);
    else for(size_t k=e;k-->i;) acc=readrow(buf+(size_t)lst[k]*RB,acc); }
  double t=now()-t0; volatile int s=_mm256_extract_epi32(acc,0);(void)s; return t; }
int main(int argc,char**argv){ RB=atoi(argv[1]); int P=argc>2?atoi(argv[2]):16;
  size_t total=(size_t)256<<20; NR=total/RB; buf=aligned_alloc(4096,NR*RB+4096); memset(buf,1,NR*RB);
  lst=malloc(sizeof(int)*NR); ord=malloc(sizeof(int)*NR); uint8_t* big=aligned_alloc(64,(size_t)64<<20); srand(1);
  for(int rep=0;rep<3;rep++) for(int pat=0;pat<3;pat++){
    nl=0; for(size_t r=0;r<NR;r++){ int keep= pat==0?1: pat==1? r<NR/2 : (rand()&1); if(keep) lst[nl++]=r; }
    size_t np=(nl+P-1)/P;
    const char* pn[]={"dense","half","rand50"};
    for(int v=0;v<4;v++){
      for(size_t i=0;i<np;i++) ord[i]=i;
      if(v>=2){ /* passes in a scrambled order: stride through by a large odd step */
        size_t step=np/7|1; while(1){ size_t a=np,b=step; while(b){size_t t=a%b;a=b;b=t;} if(a==1)break; step+=2;}
        for(size_t i=0;i<np;i++) ord[i]=(int)((i*step)%np); }
      memset(big,rep,(size_t)64<<20);
      double t=run(ord,np,P,v&1,2);
      if(rep) printf("RB %zu P %d %-6s %s%s: %.2f ms %.2f GB/s\n",RB,P,pn[pat],v>=2?"scrambled-passes":"ascending-passes",(v&1)?" rev-in-pass":"",t*1e3,nl*RB/1e9/t); }
  }
}
